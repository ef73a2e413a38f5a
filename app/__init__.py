"""Computer Shop customer accounts: registration and sign-in with emailed one-time codes."""
