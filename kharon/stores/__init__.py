"""Stores: the event log and its projection.

`MemoryStore` keeps everything in process; `SQLiteStore` is the embedded
default, one file shared by the processes of one machine.
"""

from kharon.stores._memory import MemoryStore
from kharon.stores._protocol import Stats, Store, Transaction
from kharon.stores._sqlite import SQLiteStore, migrate

__all__ = ["MemoryStore", "SQLiteStore", "Stats", "Store", "Transaction", "migrate"]
