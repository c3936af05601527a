export {
  CcebClient,
  newUuid,
  VERSION,
  type AgentRef,
  type AnyNotification,
  type ClientEvents,
  type ClientOptions,
  type CloseInfo,
  type ConnectedInfo,
  type DisconnectedInfo,
  type Notification,
  type NotificationHandler,
  type State,
  type StateInfo,
} from './client.js';
export { ActionError, type ActionErrorCode, type ErrorCode } from './errors.js';
export { afterClose, Backoff, CloseCode, ReconnectPolicy, retryAction, Seen, type AfterClose, type Delivery, type Reconnect } from './policy.js';
export { browserStorage, MemoryStorage, type KeyValueStorage } from './storage.js';
export type { WebSocketConstructor, WebSocketLike } from './socket.js';
export * from './generated/types.js';
