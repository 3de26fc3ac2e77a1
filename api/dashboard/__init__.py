"""The live operator dashboard: GET /dashboard and the summary it polls.

``page`` serves the shell (HTML, JS and CSS from this package: no CDN, no data in it);
``summary`` reads and caches what the page shows, ``series`` the releases per second.
"""
