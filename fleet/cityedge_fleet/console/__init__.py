"""The web console: server-rendered pages over the fleet's own API, in the same process.

Sign in with an API token (``session``), then pages and forms by role (``access``: the
roles of the API operation behind each), rendered on the server from Jinja2 templates with
no script at all (``web``: the CSP, the CSRF rule). ``mount.install`` mounts it on the app.
"""
