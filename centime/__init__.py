"""centime: a wallet and double-entry ledger service for micro-payments.

The package has two halves. The kernel (`errors`, `money`, `settings`, `sql`,
`metrics`, `wire`) is importable by every domain package and imports none of
them. The face (`app`, `cli`, `auth`, `migrate`, `embedded`) composes the
domain packages; no domain package imports the face.
"""
