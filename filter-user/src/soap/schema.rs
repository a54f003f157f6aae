//! Element names from the EWS schema (`types.xsd`, schema version V2018_01_08, the newest
//! Exchange serves), for the places in a response where the walker must know every element:
//! the children of items, attachments and folders. The walker looks a name up in all of
//! them at once ([`lookup`]). The lists are kept sorted by length, then by byte, so that a
//! reader finds a name in them; a unit test keeps them so.

use std::collections::HashMap;

/// Item elements (`ArrayOfRealItemsType`, `ItemAttachmentType`, the sync changes).
const ITEMS: [&str; 15] = [
    "Item",
    "Task",
    "Person",
    "Contact",
    "Message",
    "Network",
    "PostItem",
    "RoleMember",
    "CalendarItem",
    "MeetingMessage",
    "MeetingRequest",
    "SharingMessage",
    "MeetingResponse",
    "DistributionList",
    "MeetingCancellation",
];

/// Folder elements (`ArrayOfFoldersType`, the hierarchy sync changes).
const FOLDERS: [&str; 5] = [
    "Folder",
    "TasksFolder",
    "SearchFolder",
    "CalendarFolder",
    "ContactsFolder",
];

/// Every child element of every item type (`ItemType` and the types derived from it).
const ITEM_PROPERTIES: &[&str] = &[
    "Cid",
    "End",
    "UID",
    "Body",
    "Flag",
    "From",
    "Mris",
    "Size",
    "Type",
    "Urls",
    "When",
    "Wlid",
    "Alias",
    "ImMri",
    "Likes",
    "Notes",
    "Owner",
    "Photo",
    "Start",
    "FileAs",
    "Gender",
    "IsRead",
    "ItemId",
    "Offers",
    "Sender",
    "Status",
    "Comment",
    "Culture",
    "DueDate",
    "IsDraft",
    "Manager",
    "Members",
    "Mileage",
    "Preview",
    "ReplyTo",
    "SkypeId",
    "SortKey",
    "Subject",
    "Surname",
    "Birthday",
    "Children",
    "Contacts",
    "DomainId",
    "Duration",
    "Hashtags",
    "Initials",
    "IsFromMe",
    "IsHidden",
    "IsResend",
    "JobTitle",
    "LastSync",
    "Location",
    "MemberId",
    "Mentions",
    "Nickname",
    "ObjectId",
    "OtherMri",
    "PersonId",
    "PsaState",
    "Settings",
    "SourceId",
    "TextBody",
    "TimeZone",
    "CanDelete",
    "Companies",
    "CreatedBy",
    "Delegator",
    "DisplayCc",
    "DisplayTo",
    "DomainTag",
    "GivenName",
    "IconIndex",
    "InReplyTo",
    "IsClutter",
    "IsDefault",
    "IsMeeting",
    "IsPrivate",
    "ItemClass",
    "Organizer",
    "PolicyTag",
    "Resources",
    "SearchKey",
    "StartDate",
    "TotalWork",
    "UserEmail",
    "ActualWork",
    "ArchiveTag",
    "Categories",
    "Department",
    "DisplayBcc",
    "Generation",
    "HasPicture",
    "Importance",
    "InviteFree",
    "IsComplete",
    "IsTeamTask",
    "MentionsEx",
    "MiddleName",
    "NetShowUrl",
    "PassportId",
    "PostedTime",
    "Profession",
    "ProfileUrl",
    "ReceivedBy",
    "Recurrence",
    "References",
    "SpouseName",
    "TrustLevel",
    "UniqueBody",
    "AccountName",
    "Attachments",
    "BlockStatus",
    "ChangeCount",
    "ClientToken",
    "CompanyName",
    "ContactType",
    "DirectoryId",
    "DisplayName",
    "EndTimeZone",
    "ErrorOffers",
    "ImAddresses",
    "InstanceKey",
    "IsCancelled",
    "IsDelegated",
    "IsOrganizer",
    "IsOutOfDate",
    "IsRecurring",
    "IsSubmitted",
    "MentionedMe",
    "MimeContent",
    "ProposedEnd",
    "Sensitivity",
    "SyncEnabled",
    "UserTileUrl",
    "XboxLiveTag",
    "AntiLinkInfo",
    "AssignedTime",
    "AtAllMention",
    "CcRecipients",
    "ClientToken2",
    "CompleteDate",
    "CompleteName",
    "DateTimeSent",
    "EndWallClock",
    "IsAssociated",
    "IsUnmodified",
    "LikesPreview",
    "MailboxGuids",
    "PhoneNumbers",
    "RecurrenceId",
    "ResponseType",
    "SkypeContext",
    "StoreEntryId",
    "ToRecipients",
    "UnifiedInbox",
    "UserTileHash",
    "YomiNickname",
    "AbchContactId",
    "AssistantName",
    "AutoLinkError",
    "BccRecipients",
    "ContactSource",
    "DateTimeStamp",
    "DirectReports",
    "EndTimeZoneId",
    "FavoriteOrder",
    "FileAsMapping",
    "IsAllDayEvent",
    "MessageSafety",
    "OriginalStart",
    "ProposedStart",
    "RefreshToken2",
    "ReminderDueBy",
    "ReminderIsSet",
    "RetentionDate",
    "SessionHandle",
    "SourceEntryID",
    "StartTimeZone",
    "ConferenceType",
    "ContactHandles",
    "ContactShortId",
    "ConversationId",
    "EmailAddresses",
    "HasAttachments",
    "InboxReminders",
    "LastOccurrence",
    "ManagerMailbox",
    "MyResponseType",
    "NormalizedBody",
    "OfficeLocation",
    "ParentFolderId",
    "PsaLastChanged",
    "RejectedOffers",
    "StartWallClock",
    "AppliedHashtags",
    "AutoLinkSuccess",
    "DateTimeCreated",
    "DelegationState",
    "EffectiveRights",
    "FirstOccurrence",
    "IsOnlineMeeting",
    "MeetingTimeZone",
    "MentionsPreview",
    "MobileIMEnabled",
    "PercentComplete",
    "RelevanceOrder1",
    "RelevanceOrder2",
    "ResponseObjects",
    "StartTimeZoneId",
    "AdjacentMeetings",
    "AppointmentState",
    "BusinessHomePage",
    "CalendarItemType",
    "ChangeHighlights",
    "ContactSyncError",
    "ConversationGuid",
    "DateTimeReceived",
    "EnhancedLocation",
    "ExtendedProperty",
    "HasBeenProcessed",
    "HasBlockedImages",
    "LastModifiedName",
    "LastModifiedTime",
    "LastVersionSaved",
    "PhoneticFullName",
    "PhoneticLastName",
    "ReminderNextTime",
    "ShellContactType",
    "ContactCategories",
    "ConversationIndex",
    "ConversationTopic",
    "InternetMessageId",
    "IsPendingOutbound",
    "OptionalAttendees",
    "PhoneticFirstName",
    "PhysicalAddresses",
    "RequiredAttendees",
    "SenderSMTPAddress",
    "SkypeRelationship",
    "StatusDescription",
    "SupportGroupFeeds",
    "VotingInformation",
    "AbchEmailAddresses",
    "BillingInformation",
    "ContactSyncSuccess",
    "DeletedOccurrences",
    "IsMessengerEnabled",
    "LastWelcomeContact",
    "MeetingRequestType",
    "PostalAddressIndex",
    "PresenceTrustLevel",
    "ProfileLastChanged",
    "WeddingAnniversary",
    "ApprovalRequestData",
    "ClientPublishSecret",
    "ConflictingMeetings",
    "DoNotForwardMeeting",
    "FirstAuthErrorDates",
    "IsResponseRequested",
    "MeetingWorkspaceUrl",
    "ModifiedOccurrences",
    "RefreshTokenExpiry2",
    "ReminderMessageData",
    "AdjacentMeetingCount",
    "AllowNewTimeProposal",
    "AppointmentReplyTime",
    "CalendarActivityData",
    "ExchangePersonIdGuid",
    "IsAssignmentEditable",
    "IsAutoUpdateDisabled",
    "JoinOnlineMeetingUrl",
    "LegacyFreeBusyStatus",
    "ReceivedRepresenting",
    "SharingMessageAction",
    "SkypeAuthCertificate",
    "UserSMIMECertificate",
    "MSExchangeCertificate",
    "MeetingRequestWasSent",
    "NotInBirthdayCalendar",
    "OnlineMeetingSettings",
    "SharingMessageActions",
    "AppliedHashtagsPreview",
    "EntityExtractionResult",
    "HidePresenceAndProfile",
    "IntendedFreeBusyStatus",
    "InternetMessageHeaders",
    "IsReadReceiptRequested",
    "PredictedActionReasons",
    "ConflictingMeetingCount",
    "InferenceClassification",
    "AssociatedCalendarItemId",
    "PublishedCalendarItemIcs",
    "AppointmentSequenceNumber",
    "PublishedCalendarItemName",
    "TokenRefreshLastAttempted",
    "TokenRefreshLastCompleted",
    "IsDeliveryReceiptRequested",
    "ReminderMinutesBeforeStart",
    "PendingSocialActivityTagIds",
    "RightsManagementLicenseData",
    "WebClientEditFormQueryString",
    "WebClientReadFormQueryString",
    "PartnerNetworkProfilePhotoUrl",
    "PartnerNetworkThumbnailPhotoUrl",
];

/// The children of `t:ResponseObjects`: in a response, empty markers of what the item allows.
const RESPONSE_OBJECTS: [&str; 13] = [
    "AcceptItem",
    "RemoveItem",
    "DeclineItem",
    "ForwardItem",
    "ReplyToItem",
    "PostReplyItem",
    "ProposeNewTime",
    "ReplyAllToItem",
    "CancelCalendarItem",
    "AddItemToMyCalendar",
    "SuppressReadReceipt",
    "TentativelyAcceptItem",
    "AcceptSharingInvitation",
];

/// `AttachmentType`'s children, common to file and item attachments.
const ATTACHMENT_PROPERTIES: [&str; 9] = [
    "Name",
    "Size",
    "IsInline",
    "ContentId",
    "ContentType",
    "AttachmentId",
    "ContentLocation",
    "LastModifiedTime",
    "AttachmentOriginalUrl",
];

/// What `FileAttachmentType` adds.
const FILE_ATTACHMENT_PROPERTIES: [&str; 2] = ["Content", "IsContactPhoto"];

/// Every child element of every folder type (`BaseFolderType` and the types derived from it).
const FOLDER_PROPERTIES: [&str; 19] = [
    "FolderId",
    "SourceId",
    "PolicyTag",
    "ArchiveTag",
    "TotalCount",
    "AccountName",
    "DisplayName",
    "FolderClass",
    "ReplicaList",
    "UnreadCount",
    "PermissionSet",
    "ParentFolderId",
    "EffectiveRights",
    "ChildFolderCount",
    "ExtendedProperty",
    "SearchParameters",
    "DistinguishedFolderId",
    "SharingEffectiveRights",
    "ManagedFolderInformation",
];

/// The order of the lists: length first, then bytes.
#[cfg(test)]
fn order(a: &str, b: &str) -> std::cmp::Ordering {
    a.len()
        .cmp(&b.len())
        .then_with(|| a.as_bytes().cmp(b.as_bytes()))
}

/// The lists a name is in, one bit each: one lookup answers for all of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Lists(u8);

impl Lists {
    pub(crate) const ITEMS: Lists = Lists(1);
    pub(crate) const FOLDERS: Lists = Lists(1 << 1);
    pub(crate) const ITEM_PROPERTIES: Lists = Lists(1 << 2);
    pub(crate) const RESPONSE_OBJECTS: Lists = Lists(1 << 3);
    pub(crate) const ATTACHMENT_PROPERTIES: Lists = Lists(1 << 4);
    pub(crate) const FILE_ATTACHMENT_PROPERTIES: Lists = Lists(1 << 5);
    pub(crate) const FOLDER_PROPERTIES: Lists = Lists(1 << 6);

    pub(crate) fn has(self, list: Lists) -> bool {
        self.0 & list.0 != 0
    }
}

/// A name from the lists, spelt as they spell it, with the lists that hold it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Known {
    pub(crate) name: &'static str,
    pub(crate) lists: Lists,
}

/// Every name of every list. foldhash: a hash of a short name costs a few dozen
/// instructions, where a binary search of `ITEM_PROPERTIES` compared nine names (about 230
/// instructions a lookup, six lookups in an item's answer). The table is fixed, so names an
/// answer brings cannot lengthen its chains.
static TABLE: std::sync::LazyLock<HashMap<&'static str, Lists, foldhash::fast::FixedState>> =
    std::sync::LazyLock::new(|| {
        let mut table = HashMap::with_hasher(foldhash::fast::FixedState::with_seed(0));
        for (list, names) in every_list() {
            for &name in names {
                let lists: &mut Lists = table.entry(name).or_default();
                lists.0 |= list.0;
            }
        }
        table
    });

fn every_list() -> [(Lists, &'static [&'static str]); 7] {
    [
        (Lists::ITEMS, &ITEMS),
        (Lists::FOLDERS, &FOLDERS),
        (Lists::ITEM_PROPERTIES, ITEM_PROPERTIES),
        (Lists::RESPONSE_OBJECTS, &RESPONSE_OBJECTS),
        (Lists::ATTACHMENT_PROPERTIES, &ATTACHMENT_PROPERTIES),
        (
            Lists::FILE_ATTACHMENT_PROPERTIES,
            &FILE_ATTACHMENT_PROPERTIES,
        ),
        (Lists::FOLDER_PROPERTIES, &FOLDER_PROPERTIES),
    ]
}

/// The lists `name` is in (none when it is in none), and its spelling there.
pub(crate) fn lookup(name: &str) -> Known {
    TABLE
        .get_key_value(name)
        .map_or_else(Known::default, |(&name, &lists)| Known { name, lists })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lists_are_sorted_without_repeats() {
        for (_, list) in every_list() {
            assert!(
                list.windows(2).all(|w| order(w[0], w[1]).is_lt()),
                "{list:?}"
            );
        }
    }

    /// One lookup gives, for every name of every list, exactly the lists that hold it; a
    /// name in none, or spelt in another case, is in none.
    #[test]
    fn a_lookup_answers_for_every_list() {
        for (_, names) in every_list() {
            for &name in names {
                let found = lookup(name);
                assert_eq!(found.name, name);
                for (list, members) in every_list() {
                    assert_eq!(found.lists.has(list), members.contains(&name), "{name}");
                }
            }
        }
        assert!(lookup("Attachments").lists.has(Lists::ITEM_PROPERTIES));
        for name in [
            "",
            "Foo",
            "subject",
            "Subject ",
            "t:Subject",
            "CalendarItem\0",
        ] {
            assert_eq!(lookup(name), Known::default(), "{name}");
        }
    }
}
