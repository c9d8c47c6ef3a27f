"""Loading SD pipelines and LoRAs, prediction-type helpers, the embedded tiny SD and its codec."""
