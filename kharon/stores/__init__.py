"""Stores: the event log and its projection.

`MemoryStore` keeps everything in process; `SQLiteStore` is the embedded
default, one file shared by the processes of one machine.
"""

from kharon.stores._memory import MemoryStore
from kharon.stores._protocol import Stats, Store, Transaction

__all__ = ["MemoryStore", "Stats", "Store", "Transaction"]
