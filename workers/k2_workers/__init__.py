"""What the GPU worker pods run: the K2 model, expert parallelism, MuonClip, training and serving."""
