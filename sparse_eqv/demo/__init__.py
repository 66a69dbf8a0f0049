"""The `sparse-eqv demo`: convert SevenNet-0, fine-tune on an EMT Cu/Ni set, export."""
