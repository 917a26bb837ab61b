"""The web apps (`smd paint`, `smd stream --preview`) on one ASGI stack."""
