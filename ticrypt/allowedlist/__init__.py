"""ticrypt-allowedlist: the DNS allow-list of license servers for VMs (issue 10)."""
