"""The migration wire protocol as a sans-IO state machine: no sockets, no trio."""
