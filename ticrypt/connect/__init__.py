"""ticrypt-connect, the user's local agent: a token-protected JSON API on
127.0.0.1 (:mod:`~ticrypt.connect.api`) that makes tunnel client
certificates (:mod:`~ticrypt.connect.certs`) and runs tunnels: local
listeners whose connections become streams of a multiplexed, pinned TLS
connection to vmc (:mod:`~ticrypt.connect.tunnels`)."""

from ticrypt import leanimport

leanimport.install()  # before any module of this package loads autobahn
