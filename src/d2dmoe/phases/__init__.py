"""One module per conversion phase. Training phases are LightningModules run by Lightning's Trainer."""
