"""Fine-tuning (`raykit finetune`) and sweeps (`raykit tune`) on Ray Train and Ray Tune."""
