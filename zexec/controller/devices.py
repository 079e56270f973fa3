"""MUX, control and IOPub: pyzmq's C ``monitored_queue`` between two bound sockets.

No Python runs between the two sockets: the device relays both ways and copies each
message, prefixed, to a PUB socket connected to the hub's monitor.  For ROUTER/ROUTER
queues (MUX, control) it swaps the first two identities, so a client addresses an
engine by the engine's identity and the engine's reply finds its client.
"""

from __future__ import annotations

import logging

import zmq
from zmq.devices import monitored_queue

from ..connection import ConnectionInfo, context, secure

log = logging.getLogger("zexec.devices")

#: device name -> (in type, in channel, out type, out channel, in prefix, out prefix)
DEVICES = {
    "mux": (zmq.ROUTER, "mux_client", zmq.ROUTER, "mux_engine", b"mux_in", b"mux_out"),
    "control": (zmq.ROUTER, "control_client", zmq.ROUTER, "control_engine", b"ctrl_in", b"ctrl_out"),
    "iopub": (zmq.SUB, "iopub_engine", zmq.PUB, "iopub_client", b"iopub_in", b"iopub_out"),
}


def main(info: ConnectionInfo, name: str) -> None:
    in_type, in_chan, out_type, out_chan, in_prefix, out_prefix = DEVICES[name]
    ctx = context()
    ins = ctx.socket(in_type)
    outs = ctx.socket(out_type)
    mon = ctx.socket(zmq.PUB)
    for s in (ins, outs, mon):
        s.sndhwm = s.rcvhwm = 0 if name != "iopub" else 100_000
        s.linger = 0
    if in_type == zmq.SUB:
        ins.subscribe(b"")
    # No ROUTER_HANDOVER on the engines' side: routing identities are engine uuids, which
    # anyone who can connect reads off the notification feed, and with handover a
    # stranger's socket naming itself so took the engine's route (its requests then went
    # to the stranger and their futures hung).  Without it the first connection keeps
    # the identity and a later one with the same identity is ignored; an engine's own
    # reconnection finds its old connection already closed (see security.md).
    secure(ins, info, server=True)
    secure(outs, info, server=True)
    secure(mon, info, server=False)
    ins.bind(info.bind_url(in_chan))
    outs.bind(info.bind_url(out_chan))
    mon.connect(info.url("monitor"))
    log.info("%s device up", name)
    try:
        monitored_queue(ins, outs, mon, in_prefix, out_prefix)
    except zmq.ContextTerminated:
        pass
    finally:
        ctx.destroy(linger=0)
