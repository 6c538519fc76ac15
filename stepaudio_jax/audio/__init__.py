"""Audio features of the speech decoder: log-mel, the code stream's 2:3 groups, the stand-in
speaker vector. Imports only config: models (the vocoder's losses), data and inference use it."""
