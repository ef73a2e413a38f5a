"""Routes that exist only in development (the mail inbox) or test (the clock hook)."""
