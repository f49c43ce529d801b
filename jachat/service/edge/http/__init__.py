"""The OpenAI-compatible HTTP edge (aiohttp): routes, OpenAI request and response shapes, HTTP statuses."""
