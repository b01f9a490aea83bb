"""Shared nftables mechanics: rulesets as values rendered to ``nft -f`` text
(:mod:`ticrypt.nft.ruleset`) and applying them atomically through the
reactor (:mod:`ticrypt.nft.apply`).  No role logic lives here."""
