"""Registration, sign-in, the code step, sign-out: the HTTP side of the flows."""
