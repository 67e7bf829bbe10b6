"""The migration wire protocol as a sans-IO state machine: no sockets, no trio.

    conn = Connection(Role.SOURCE, node="host-a", psk=key)
    sock.sendall(conn.send(conn.make_hello()))
    conn.receive_data(sock.recv(65536))          # b"" means EOF
    while (event := conn.next_event()) is not NEED_DATA: ...

The state tables are in states.py, the bounds (each with its reason) in limits.py.
"""

from .connection import Connection as Connection
from .connection import Negotiated as Negotiated
from .errors import LocalProtocolError as LocalProtocolError
from .errors import ProtocolError as ProtocolError
from .errors import RemoteProtocolError as RemoteProtocolError
from .events import NEED_DATA as NEED_DATA
from .events import Abort as Abort
from .events import Accept as Accept
from .events import Auth as Auth
from .events import Close as Close
from .events import Commit as Commit
from .events import ConnectionClosed as ConnectionClosed
from .events import DeviceState as DeviceState
from .events import Done as Done
from .events import Event as Event
from .events import Hello as Hello
from .events import Loaded as Loaded
from .events import MemoryRegion as MemoryRegion
from .events import NeedData as NeedData
from .events import PageBatch as PageBatch
from .events import Progress as Progress
from .events import Query as Query
from .events import QueryResult as QueryResult
from .events import Running as Running
from .events import VmDescription as VmDescription
from .limits import DEFAULT_MAX_BATCH_BYTES as DEFAULT_MAX_BATCH_BYTES
from .limits import PROTOCOL_VERSION_MAX as PROTOCOL_VERSION_MAX
from .limits import PROTOCOL_VERSION_MIN as PROTOCOL_VERSION_MIN
from .states import Role as Role
from .states import State as State

__all__ = [
    "DEFAULT_MAX_BATCH_BYTES",
    "NEED_DATA",
    "PROTOCOL_VERSION_MAX",
    "PROTOCOL_VERSION_MIN",
    "Abort",
    "Accept",
    "Auth",
    "Close",
    "Commit",
    "Connection",
    "ConnectionClosed",
    "DeviceState",
    "Done",
    "Event",
    "Hello",
    "LocalProtocolError",
    "Loaded",
    "MemoryRegion",
    "NeedData",
    "Negotiated",
    "PageBatch",
    "Progress",
    "ProtocolError",
    "Query",
    "QueryResult",
    "RemoteProtocolError",
    "Role",
    "Running",
    "State",
    "VmDescription",
]
