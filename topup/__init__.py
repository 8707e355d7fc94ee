"""Top-ups: Stripe PaymentIntents, the checkout page and webhooks. Not built yet."""
