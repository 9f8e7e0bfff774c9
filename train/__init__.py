"""Training: corpus -> vocabulary -> TBPTT batches -> StackedLSTM -> checkpoint (needs torch)."""
