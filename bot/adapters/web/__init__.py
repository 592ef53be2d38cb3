"""The web platform: a Gradio drawing page and owner dashboard on the chat core. Modules, one job each:

    access.py        who may reach it (loopback, passwords) - checked before anything loads
    sessions.py      signed session cookies that survive restarts
    conversation.py  the core's Conversation for the page (per-draw feed, per-user inbox)
    drawing.py       page actions as core calls, followed to their end
    pictures.py      owner-only picture route and its HTML
    page.py          the drawing page (Gradio Blocks)
    dashboard.py     the owner dashboard (Gradio Blocks)
    server.py        the ASGI app, session/CSRF layer and WebPlatform (uvicorn in the bot's loop)

Only server.py, page.py and dashboard.py import Gradio; `drawbot run` imports it once the page is on.
"""
