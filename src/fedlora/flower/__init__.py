"""fedlora's server-based methods as a Flower app (``fedlora flower-app``, ``fedlora flower-run``).

The ServerApp (``server_app``) runs the run loop and server round of ``fedlora.engines`` with
the SuperNodes as the placement (``hosts.FlowerHosts``, over Flower's Grid); each SuperNode's
ClientApp (``client_app``) rebuilds the experiment from the fedlora config carried in the run
config and answers for the
clients of the partition its node config names, keeping their state on the node
(``node_state``). ``protocol`` is what the two sides put in a Flower message. Importing this
package imports no Flower module; ``flwr`` is needed only by the apps and the launcher.
"""
