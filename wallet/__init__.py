"""Wallets: balances in Redis, the debit path, the sweeper. May import ledger."""
