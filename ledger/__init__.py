"""The double-entry ledger: entries, lines, accounts, and the group-commit writer.

Imports no sibling domain package."""
