"""The controller: hub, heartbeat monitor, MUX/control/IOPub devices and task scheduler."""
