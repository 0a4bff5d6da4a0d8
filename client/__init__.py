"""Hospital side: records, privacy ledger, DP-SGD trainer, Flower ClientApp."""
