"""HTTP plumbing shared by every feature: middlewares, error pages, the session cookie,
request guards and the loop monitor. Features import from here; the domain never does."""
