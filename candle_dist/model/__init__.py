"""Model: the Candle head and its losses."""
