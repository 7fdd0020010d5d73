"""Run the store contract (tests/store_contract.py) on every store in conftest.py."""

from __future__ import annotations

from store_contract import StoreContract


class TestStoreContract(StoreContract):
    """Every contract test, once per store."""
