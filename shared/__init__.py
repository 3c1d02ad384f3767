"""Hangar's common library: settings, database, gRPC server bootstrap, auth, errors, ids, outbox."""
