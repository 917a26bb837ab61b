"""Loading a model, and what acts on its rows: LoRAs, ControlNets, IP-Adapters, embeddings."""
