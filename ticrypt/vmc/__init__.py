"""ticrypt-vmc: the VM controller.

It keeps authenticated websockets open to the proxy, runs the VM end of the
secure channel for each paired user, pins the owner key and executes
commands and terminals for authorized users.

Layers: :mod:`~ticrypt.vmc.state` (files in ``state_dir``),
:mod:`~ticrypt.vmc.enroll` (one HTTPS call to rest),
:mod:`~ticrypt.channel.app` (application-protocol codec, shared with the
frontend), :mod:`~ticrypt.vmc.commands` (sans-IO dispatcher),
:mod:`~ticrypt.vmc.control` (sans-IO proxy control exchange),
:mod:`~ticrypt.vmc.processes` (child processes), :mod:`~ticrypt.vmc.session`
(one established channel: dispatcher, processes, audit, idle timer),
:mod:`~ticrypt.vmc.leg` (one websocket to the proxy), :mod:`~ticrypt.vmc.pool`
(the sockets waiting at the proxy, the session limits),
:mod:`~ticrypt.vmc.config` (the typed config) and :mod:`~ticrypt.vmc.tap`
(twistd wiring).
"""

from ticrypt import leanimport

leanimport.install()  # before any module of this package loads autobahn
