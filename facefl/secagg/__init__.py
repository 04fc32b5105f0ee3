"""Secure aggregation in the style of SecAgg+ (Bonawitz et al., CCS 2017; Bell et al., CCS 2020), without
transport: Shamir sharing, key agreement, PRG masks, fixed point, the neighbour graph, and the device's and
the server's protocol steps. ``docs/privacy.md`` ("Secure aggregation") describes the protocol."""
