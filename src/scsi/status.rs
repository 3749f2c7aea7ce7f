//! SCSI status codes (SAM-5, table "Status codes").
//!
//! The status byte ends every command; CHECK CONDITION means sense data
//! follows (see [`super::sense`]).

use std::fmt;

/// The status byte a target returns for a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScsiStatus {
    /// 0x00: the command completed successfully.
    Good,
    /// 0x02: the command failed; sense data describes why.
    CheckCondition,
    /// 0x04: PRE-FETCH found the requested blocks fit in cache.
    ConditionMet,
    /// 0x08: the logical unit is busy; retry later.
    Busy,
    /// 0x18: another initiator holds a reservation on the logical unit.
    ReservationConflict,
    /// 0x28: the task set is full; retry once other commands completed.
    TaskSetFull,
    /// 0x30: an auto contingent allegiance condition is active.
    AcaActive,
    /// 0x40: the command was aborted by another I_T nexus or a task management function.
    TaskAborted,
    /// Any other (reserved or obsolete) value.
    Other(u8),
}

impl ScsiStatus {
    /// Decodes a status byte; never fails, unknown values become [`ScsiStatus::Other`].
    pub fn from_u8(v: u8) -> Self {
        match v {
            0x00 => Self::Good,
            0x02 => Self::CheckCondition,
            0x04 => Self::ConditionMet,
            0x08 => Self::Busy,
            0x18 => Self::ReservationConflict,
            0x28 => Self::TaskSetFull,
            0x30 => Self::AcaActive,
            0x40 => Self::TaskAborted,
            other => Self::Other(other),
        }
    }

    /// The status byte on the wire.
    pub fn as_u8(self) -> u8 {
        match self {
            Self::Good => 0x00,
            Self::CheckCondition => 0x02,
            Self::ConditionMet => 0x04,
            Self::Busy => 0x08,
            Self::ReservationConflict => 0x18,
            Self::TaskSetFull => 0x28,
            Self::AcaActive => 0x30,
            Self::TaskAborted => 0x40,
            Self::Other(v) => v,
        }
    }

    /// The name SAM uses, for log lines.
    pub fn name(self) -> &'static str {
        match self {
            Self::Good => "GOOD",
            Self::CheckCondition => "CHECK CONDITION",
            Self::ConditionMet => "CONDITION MET",
            Self::Busy => "BUSY",
            Self::ReservationConflict => "RESERVATION CONFLICT",
            Self::TaskSetFull => "TASK SET FULL",
            Self::AcaActive => "ACA ACTIVE",
            Self::TaskAborted => "TASK ABORTED",
            Self::Other(_) => "reserved status",
        }
    }

    /// True for the statuses that mean the command did what was asked.
    pub fn is_success(self) -> bool {
        matches!(self, Self::Good | Self::ConditionMet)
    }
}

impl From<u8> for ScsiStatus {
    fn from(v: u8) -> Self {
        Self::from_u8(v)
    }
}

impl fmt::Display for ScsiStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (0x{:02x})", self.name(), self.as_u8())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_byte_round_trips() {
        for v in 0..=255u8 {
            assert_eq!(ScsiStatus::from_u8(v).as_u8(), v);
        }
    }

    #[test]
    fn names_and_display() {
        assert_eq!(ScsiStatus::from_u8(2), ScsiStatus::CheckCondition);
        assert_eq!(ScsiStatus::from_u8(0x28).name(), "TASK SET FULL");
        assert_eq!(
            ScsiStatus::from_u8(0x18).to_string(),
            "RESERVATION CONFLICT (0x18)"
        );
        assert_eq!(
            ScsiStatus::from_u8(0x10).to_string(),
            "reserved status (0x10)"
        );
        assert!(ScsiStatus::ConditionMet.is_success());
        assert!(!ScsiStatus::Busy.is_success());
    }
}
