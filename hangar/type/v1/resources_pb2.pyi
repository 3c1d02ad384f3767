from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class Resources(_message.Message):
    __slots__ = ("ram_mb", "cpu_millis", "bandwidth_gb")
    RAM_MB_FIELD_NUMBER: _ClassVar[int]
    CPU_MILLIS_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_GB_FIELD_NUMBER: _ClassVar[int]
    ram_mb: int
    cpu_millis: int
    bandwidth_gb: int
    def __init__(self, ram_mb: _Optional[int] = ..., cpu_millis: _Optional[int] = ..., bandwidth_gb: _Optional[int] = ...) -> None: ...
