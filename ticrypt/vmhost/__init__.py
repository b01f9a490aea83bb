"""ticrypt-vmhost: host port ``base + N`` reaches port 22 of VM N, through
user-space forwarders (:mod:`.forward`) or nftables DNAT rules
(:mod:`.firewall`)."""
