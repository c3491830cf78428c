"""certlog: the certified log's primitives (BLS co-signatures today; blocks, certificates and the engine next)."""
