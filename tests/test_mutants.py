"""Tests that kill mutants mutmut found surviving in app/otp and app/security (tests/README.md)."""
