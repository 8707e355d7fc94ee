"""centime: a wallet and double-entry ledger service for micro-payments.

The package has two halves. The kernel (`errors`, `money`, `settings`,
`invariant`) is importable by every domain package and imports none of them.
The face (`app`, `cli`, `embedded`, `metrics`, `auth`, `health`) composes the
domain packages; no domain package imports the face.
"""
