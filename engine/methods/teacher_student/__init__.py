"""Teacher–student methods: a trainable network learns to reproduce a frozen pretrained teacher on normal images."""
