-- v11 (compatible with v10+): How far a room's read-back got
-- progress holds, as JSON, how far the read-back of a marked room got (where each of its passes goes on, and when
-- the read that the passes started from began), so that a read-back cut short by a crash or a failing homeserver
-- goes on from there instead of from the room's newest event. It goes with the row, and is cleared when the room
-- is marked from an earlier time than the passes read back to.
ALTER TABLE readback ADD COLUMN progress TEXT;
