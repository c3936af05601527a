/** Error codes of the contract (section 7). */
export type ErrorCode =
  | 'invalid_json'
  | 'invalid_message'
  | 'unknown_type'
  | 'not_authenticated'
  | 'unauthorized'
  | 'unknown_action'
  | 'reserved_field'
  | 'invalid_action_details'
  | 'unknown_agent'
  | 'backend_unavailable'
  | 'rate_limited'
  | 'too_many_sessions';

/**
 * Why `action()` was not acknowledged.
 *
 * - a contract `ErrorCode`: the bridge refused it (`field` names the offending
 *   field where the contract says so). The transient codes
 *   (`backend_unavailable`, `rate_limited`) only end here when the deadline
 *   passed while retrying;
 * - `timeout`: no `ack` before the action's deadline (the bridge may still have
 *   published it; retrying with the same uuid is safe within its dedup window);
 * - `closed`: the client stopped before the action was acknowledged.
 */
export type ActionErrorCode = ErrorCode | 'timeout' | 'closed';

export class ActionError extends Error {
  override readonly name = 'ActionError';
  constructor(
    readonly code: ActionErrorCode,
    message: string,
    /** The offending field (`data.action`, `interactionId`, `deltas.recordingControls`...), when the bridge names one. */
    readonly field?: string,
    /** The action's uuid: sending it again under this uuid can never publish it twice. */
    readonly uuid?: string,
  ) {
    super(`${code}: ${message}`);
  }
}
