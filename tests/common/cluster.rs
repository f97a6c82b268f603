//! Real `expertmesh` processes on loopback (filled in with the distributed tests).
