from hangar.runtime.v1 import runtime_pb2 as _runtime_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class JoinAgentRequest(_message.Message):
    __slots__ = ("token_id", "csr", "proof")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    CSR_FIELD_NUMBER: _ClassVar[int]
    PROOF_FIELD_NUMBER: _ClassVar[int]
    token_id: str
    csr: bytes
    proof: bytes
    def __init__(self, token_id: _Optional[str] = ..., csr: _Optional[bytes] = ..., proof: _Optional[bytes] = ...) -> None: ...
