-- v5: The invitee of a relayed call
-- invitee is the real user a call invite named (its invitee field, mapped from their ghost), '' when the invite
-- named nobody: only that user may answer or reject the call on the callee side, and glare is judged only between
-- the two parties.
ALTER TABLE relayed_call ADD COLUMN invitee TEXT NOT NULL DEFAULT '';
