"""Security building blocks.

`crypto` and `passwords` are plain Python (the domain packages use them); `csrf`, `headers`
and `proxies` are the HTTP side and import Starlette. This file imports none of them, so
`import app.security.crypto` loads no web framework.
"""
