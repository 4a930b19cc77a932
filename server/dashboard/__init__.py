"""The admin dashboard under /admin: server-rendered pages over the same services as the API."""
