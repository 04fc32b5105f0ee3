"""Privacy of what the server releases: the DP-FedAvg mechanism (:mod:`facefl.privacy.dp`: clipping and
Gaussian noise on the sum of a round's updates) and its accountant (:mod:`facefl.privacy.accountant`:
the (epsilon, delta) spent after a number of rounds). Pure functions; the server wires them in."""
