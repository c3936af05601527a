use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The notification ids of contract section 5.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NotificationType {
    InteractionsList,
    AgentInteraction,
    InteractionUpdate,
    Presence,
    CallLeg,
    SwitchLine,
    RecordingReady,
    CampaignStatus,
    AgentLineStatus,
    MonitoringAgentList,
    Provisioning,
    PhoneValidation,
    OffHook,
    AgentPhoneUpdate,
}

impl NotificationType {
    pub const ALL: [NotificationType; 14] = [
        NotificationType::InteractionsList,
        NotificationType::AgentInteraction,
        NotificationType::InteractionUpdate,
        NotificationType::Presence,
        NotificationType::CallLeg,
        NotificationType::SwitchLine,
        NotificationType::RecordingReady,
        NotificationType::CampaignStatus,
        NotificationType::AgentLineStatus,
        NotificationType::MonitoringAgentList,
        NotificationType::Provisioning,
        NotificationType::PhoneValidation,
        NotificationType::OffHook,
        NotificationType::AgentPhoneUpdate,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NotificationType::InteractionsList => "interactions_list",
            NotificationType::AgentInteraction => "agent_interaction",
            NotificationType::InteractionUpdate => "interaction_update",
            NotificationType::Presence => "presence",
            NotificationType::CallLeg => "call_leg",
            NotificationType::SwitchLine => "switch_line",
            NotificationType::RecordingReady => "recording_ready",
            NotificationType::CampaignStatus => "campaign_status",
            NotificationType::AgentLineStatus => "agent_line_status",
            NotificationType::MonitoringAgentList => "monitoring_agent_list",
            NotificationType::Provisioning => "provisioning",
            NotificationType::PhoneValidation => "phone_validation",
            NotificationType::OffHook => "off_hook",
            NotificationType::AgentPhoneUpdate => "agent_phone_update",
        }
    }

    /// Dense index (position in [`NotificationType::ALL`]), for per-type metric handles.
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for NotificationType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for NotificationType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NotificationType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| format!("unknown notification type `{s}`"))
    }
}
