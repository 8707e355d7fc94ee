"""The nightly reconciler: Stripe balance transactions against the ledger. Not built yet."""
